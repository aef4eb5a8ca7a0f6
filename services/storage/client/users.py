"""StorageService handlers of users and roles, and Authenticate."""

from __future__ import annotations

from shoal.storage.v1 import storage_pb2 as pb

from services.storage.client.base import ClientHandlers
from services.storage.permissions import Permission, UserIdentity, permission_of
from services.storage.rpc import Ctx, administer, caller
from services.storage.users import User


def user_info(user: User) -> pb.User:
    return pb.User(username=user.name, role=user.role, active=user.active)


def role_info(name: str, permission: Permission) -> pb.Role:
    return pb.Role(name=name, permission=permission.json)


class UserHandlers(ClientHandlers):
    async def AddUser(self, request: pb.AddUserRequest, context: Ctx) -> pb.AddUserResponse:
        administer("add users")
        active = request.active if request.HasField("active") else True
        user = await self.users.add_user(request.username, request.password, request.role, active)
        return pb.AddUserResponse(user=user_info(user))

    async def AlterUser(self, request: pb.AlterUserRequest, context: Ctx) -> pb.AlterUserResponse:
        administer("alter users")
        user = await self.users.alter_user(
            request.username,
            request.password if request.HasField("password") else None,
            request.role if request.HasField("role") else None,
            request.active if request.HasField("active") else None,
        )
        return pb.AlterUserResponse(user=user_info(user))

    async def DropUser(self, request: pb.DropUserRequest, context: Ctx) -> pb.DropUserResponse:
        administer("drop users")
        self.users.drop_user(request.username)
        return pb.DropUserResponse()

    async def ListUsers(self, request: pb.ListUsersRequest, context: Ctx) -> pb.ListUsersResponse:
        administer("list users")
        return pb.ListUsersResponse(users=[user_info(u) for u in self.users.users()])

    async def AddRole(self, request: pb.AddRoleRequest, context: Ctx) -> pb.AddRoleResponse:
        administer("add roles")
        permission = self.users.add_role(request.name, request.permission)
        return pb.AddRoleResponse(role=role_info(request.name, permission))

    async def AlterRole(self, request: pb.AlterRoleRequest, context: Ctx) -> pb.AlterRoleResponse:
        administer("alter roles")
        permission = self.users.alter_role(request.name, request.permission)
        return pb.AlterRoleResponse(role=role_info(request.name, permission))

    async def DropRole(self, request: pb.DropRoleRequest, context: Ctx) -> pb.DropRoleResponse:
        administer("drop roles")
        self.users.drop_role(request.name)
        return pb.DropRoleResponse()

    async def ListRoles(self, request: pb.ListRolesRequest, context: Ctx) -> pb.ListRolesResponse:
        administer("list roles")
        return pb.ListRolesResponse(roles=[role_info(n, p) for n, p in self.users.roles()])

    async def CreateAuthenticationTokens(
        self, request: pb.CreateAuthenticationTokensRequest, context: Ctx
    ) -> pb.CreateAuthenticationTokensResponse:
        operation_token, refresh_token = self.users.issue_tokens(caller())
        return pb.CreateAuthenticationTokensResponse(
            operation_token=operation_token, refresh_token=refresh_token
        )

    async def Authenticate(
        self, request: pb.AuthenticateRequest, context: Ctx
    ) -> pb.AuthenticateResponse:
        who = caller()
        user = who if isinstance(who, UserIdentity) else None
        return pb.AuthenticateResponse(
            username=who.name,
            role=user.role if user is not None else "",
            super_user=who.super_user,
            permission=(user.permission if user is not None else permission_of(who)).json,
            internal=who.internal,
        )
